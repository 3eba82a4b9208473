"""Critics over (state, noise) and (state, action chunk): FASTER's Q^dn and EXPO's Q^a."""
