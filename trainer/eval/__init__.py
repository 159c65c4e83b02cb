"""Evaluation: `metrics` (FID/KID with the FID Inception network), `swd` (sliced Wasserstein distance),
`protocol` (image sets, the reference-statistics cache, computing the metrics of a sample set) and `plots`
(metric-vs-step curves of runs)."""
