"""wanserve: a self-hosted Wan 2.2 text-to-video server, wire-compatible with fal-ai/wan-22."""

__version__ = "0.1.0"
