"""The API's routers, one per concern: cases (upload, images, corrections, workspace saves)
and service (health, model, report, fine-tuning)."""
