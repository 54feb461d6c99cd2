"""How the model is spread over processes; no model math of its own."""
