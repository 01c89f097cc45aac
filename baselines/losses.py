"""Cost-sensitive losses: focal, ASL, LDAM, class-balanced weights and deferred re-weighting."""
