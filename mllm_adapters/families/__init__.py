"""Model families: one module each, one ``@register_family`` `FamilySpec` subclass per module."""
