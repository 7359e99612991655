"""Rules' storage: the ORM schema, and one store per concern over it."""
