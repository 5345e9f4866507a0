"""Reading run records back: finding run folders, one table across runs (CSV, Markdown) and its plots."""
