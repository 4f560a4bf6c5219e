"""Client-side helpers."""
