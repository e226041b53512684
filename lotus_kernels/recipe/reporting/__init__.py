"""What the recipe writes for people to read: ``report`` (report.md of a run folder, metrics
tables) and ``plots`` (the matplotlib figures; matplotlib is imported only when drawing)."""
