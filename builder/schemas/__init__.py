"""JSON Schemas for customer.yaml and both analysis forms (printed by `builder schema`)."""
