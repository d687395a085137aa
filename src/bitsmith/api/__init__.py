"""The orchestrators users call: compress (in memory or block by block from disk), evaluate, inspect,
analyze, export."""
