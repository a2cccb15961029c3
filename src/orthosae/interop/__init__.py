"""Other libraries' SAE formats: SAELens and dictionary_learning, read and written."""
