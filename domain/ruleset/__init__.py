"""The rule-set language: its model, its YAML form, points expressions and templates, its regex dialect."""
