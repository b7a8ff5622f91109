"""rayalign stages: one module or package per stage kind, plus the pieces they share."""
