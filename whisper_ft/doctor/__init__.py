"""The data doctor behind `python -m whisper_ft.cli.inspect`: what a dataset holds and what is wrong with it,
read through the training loop's own readers and checks (whisper_ft.batches, whisper_ft.data).

survey   every sample once: the loop's skip reason, audio facts, transcript facts
audio    loudness, clipping and an energy-based speech share of one clip
text     the corpus's writing habits: script, digits vs number words, casing, split words, duplicates
scoring  with a model: greedy transcripts and per-token loss of the given transcript, per sample
ranking  which samples to look at first, and why
cost     steps per epoch and the measured speed and memory of bench/README.md turned into an estimate
plots    the PNG plots
report   report.json, report.md and the console summary
Reasons and what they mean: docs/inspect.md.
"""
