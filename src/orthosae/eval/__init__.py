"""Evaluations in SAEBench's result schema: core, absorption, sparse probing, unlearning, synthetic.

Each eval module exposes `evaluate(ctx: EvalContext, cfg) -> dict`, returning one section of the results
JSON (built with `results.section`). `orthosae eval` assembles the sections into one file.
"""
