"""Context-aware nudges: catalog, features, eligibility, policy, delivery and learning."""
