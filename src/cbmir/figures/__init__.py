"""Pictures: retrieval grids, run galleries, embedding maps, report bar charts, `cbmir-plot`."""
