"""alignlib: preference-alignment losses for language models, validated against TRL.

    from alignlib.losses import dpo_loss
"""

__version__ = "0.1.0"
