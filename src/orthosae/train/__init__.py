"""Training: the per-step trainer, the loop around it, schedules and logging."""
