"""The series' baseline eight times, as its training repo ran it: runs 8xa100m40-baseline and
8xa100m40-baseline-2 … -8 there have byte-identical model.json and train.json (seed 42, the same data in the
same order, on the same kind of machine), so the spread of their test losses is GPU nondeterminism alone,
not seed variance (experiments/noise.py varies the seeds). Repeat 0 is the baseline of every other gpt2-small
file: one run, trained once for all of them.
"""

from orchestrator.specs import Experiment

experiment = Experiment(name="baseline", preset="gpt2-small", vary="none", repeats=8)
