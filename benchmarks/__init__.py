"""featinv's benchmarks: `python -m benchmarks.quality` (reconstruction quality) and
`python -m benchmarks.run` (performance). Figures go to benchmarks/results/."""
