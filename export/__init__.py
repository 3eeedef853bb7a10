"""SavedModel export of trained CaGeM models (see saved_model.py) and its command-line tools."""
