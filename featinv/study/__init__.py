"""The study grid, its leaderboard and figures, and the executors that run it (here or on Dask)."""
