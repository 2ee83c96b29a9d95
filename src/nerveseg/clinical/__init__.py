"""Clinical use of measurements: carpal tunnel screening."""
