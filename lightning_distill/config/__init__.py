"""Recipes: typed config fields and validation, the recipe file and its loading, one registry per role."""
