"""How a drawing is asked for beyond its prompt: options, LoRAs, schedulers, reference steering."""
