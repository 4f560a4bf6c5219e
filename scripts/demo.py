"""The README's first command: one text-to-video request through the real service on the embedded
defaults (SQLite queue, local file storage, the built-in tiny model), saved as demo.mp4.

It starts `wanserve serve`, submits through the fal queue API, prints the worker's progress logs as
they arrive, downloads the video and stops the server.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

from wanserve.client.local_server import ServerNotReady, free_port, start_server, wait_until

APP = "fal-ai/wan-22"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="wanserve-data")
    parser.add_argument("-o", "--output", default="demo.mp4")
    args = parser.parse_args()
    request = {
        "prompt": "A red fox trots through fresh snow at dawn, cinematic",
        "resolution": "480p",
        "num_inference_steps": 4,
        "seed": 42,
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(Path(args.data_dir), port)
    try:
        try:
            wait_until(server, url)
        except ServerNotReady as exc:
            print(exc, file=sys.stderr)
            return 1
        submitted = httpx.post(f"{url}/{APP}", json=request).raise_for_status().json()
        print(f"submitted {submitted['request_id']}", flush=True)
        seen = 0
        while True:
            status = httpx.get(submitted["status_url"], params={"logs": "1"}).json()
            for line in (status.get("logs") or [])[seen:]:
                print(f"  {line['message']}", flush=True)
            seen = len(status.get("logs") or [])
            if status["status"] == "COMPLETED":
                break
            time.sleep(0.25)
        result = httpx.get(submitted["response_url"])
        if result.status_code != 200:
            print(f"request failed: {result.text}", file=sys.stderr)
            return 1
        output = result.json()
        Path(args.output).write_bytes(httpx.get(output["video"]["url"]).raise_for_status().content)
        print(f"{Path(args.output).resolve()}\nseed {output['seed']}\nvideo {output['video']['url']}")
        return 0
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
