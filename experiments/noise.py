"""Repeated baselines: what is noise? (The series' seven repeats used byte-identical configs, so they
measured GPU nondeterminism only.) Here: 4 initialisation seeds × 2 identical repeats each."""

from orchestrator.specs import Experiment

experiment = Experiment(name="noise", preset="gpt2-small", seeds=4, repeats=2)
