"""The config: typed schemas, the checks that turn a composed config into a plan, error sentences, file locations."""
