"""Training the demo model (not part of refsd's runtime): ``shapes`` draws the captioned dataset,
``tiny_shapes`` trains and exports the model, ``judge`` measures what a generated image shows."""
