"""Query a stored database with any image: `cbmir-query` (see docs/query.md)."""
