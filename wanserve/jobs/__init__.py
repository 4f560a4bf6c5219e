"""Jobs: what a request is while it waits, runs and finishes, and the service the API calls."""
