"""Recording a fine-tune: the MeZO optimizer (step(closure)), the train loop, data and task objectives,
PEFT wrapping, and the published default settings."""
