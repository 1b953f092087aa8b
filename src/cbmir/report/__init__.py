"""Sweep reports: one CSV, Markdown tables laid out like the paper's, bar charts, W&B summary.

`cbmir-report SWEEP_DIR` (or `python -m cbmir.report`). Submodules import their heavy
dependencies (pandas, matplotlib, wandb) themselves, so importing the package stays light.
"""
