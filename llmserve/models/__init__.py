"""The served models: their files and versions, and the registry the API asks for a request's model."""
