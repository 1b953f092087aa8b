"""Pictures: query galleries, neighbour grids, embedding maps, report charts."""
