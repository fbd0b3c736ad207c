"""Task code: reading text-classification files, splitting them across clients, building the model."""
