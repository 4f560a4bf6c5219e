"""File stores: one interface (`FileStore`), a local directory (embedded) and, for scale-out, S3."""
