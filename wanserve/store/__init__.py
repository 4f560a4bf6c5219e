"""Job stores: one interface (`JobStore`), one embedded backend (SQLite) and, for scale-out, Redis."""
