"""attnlab.analysis: capture attention inside real models, head-level metrics and interventions."""
