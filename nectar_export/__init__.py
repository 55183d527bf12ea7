"""nectar_export: fit Nectar heads for a (model, document) pair, evaluate them, export artifacts."""
