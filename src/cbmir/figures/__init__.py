"""Every picture cbmir draws (matplotlib, Agg canvas, written atomically)."""
