"""Model management: the manager that owns every model, one model thread and lock per device."""
