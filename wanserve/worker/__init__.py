"""Workers: claim jobs from the job store, run the engine, store the video, report the outcome."""
