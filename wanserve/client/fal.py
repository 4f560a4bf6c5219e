"""Point the official Python `fal-client` at a wanserve server: one line, no other code changes.

    from wanserve.client.fal import use_wanserve
    use_wanserve("http://gpu-box:8000", key="...")   # then use fal_client exactly as before

fal-client hard-codes https fal hosts; it keeps its URL bases in module globals, which this rewrites
to the roles one wanserve port serves: queue at the root, sync run under /run, the storage REST API
under /rest and the CDN upload under /cdn.
"""

from __future__ import annotations

import os


def use_wanserve(url: str, key: str | None = None) -> None:
    """Send every fal-client call (queue, run, stream, uploads) to the wanserve server at `url`.

    `key` is the server's API key (default: WANSERVE_KEY; for a server without auth, a placeholder, since
    fal-client refuses to run with no credentials at all). It is the only credential sent to this server:
    fal-client's default clients are given it, and FAL_KEY is set to it for clients made later, so none falls back
    to a key meant for fal's hosted service (FAL_KEY_ID/FAL_KEY_SECRET) or to the `fal auth login` token
    (FAL_FORCE_AUTH_BY_USER, which is removed from this process's environment). Call it before the first upload:
    fal-client remembers the storage URL once it has fetched an upload token.
    """
    import fal_client
    import fal_client.client as fal

    base = url.rstrip("/")
    fal.QUEUE_URL_FORMAT = f"{base}/"
    fal.RUN_URL_FORMAT = f"{base}/run/"
    fal.REST_URL = f"{base}/rest"
    fal.CDN_URL = f"{base}/cdn"
    fal.REALTIME_URL_FORMAT = f"{base.replace('http', 'ws', 1)}/"
    server_key = key or os.environ.get("WANSERVE_KEY") or "wanserve"
    os.environ["FAL_KEY"] = server_key
    os.environ.pop("FAL_FORCE_AUTH_BY_USER", None)
    # The default clients cache credentials, HTTP clients and the upload token on first use: forget them.
    for client in (fal_client.sync_client, fal_client.async_client):
        for cached in ("_auth", "_client", "_token_manager"):
            client.__dict__.pop(cached, None)
        object.__setattr__(client, "key", server_key)  # SyncClient is a frozen dataclass
