"""The HTTP layer: thin FastAPI routers over the job service, the file store and the webhook signer."""
