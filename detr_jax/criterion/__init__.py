"""How predictions meet targets: the class convention, matching costs and assignment, the loss terms and SetCriterion over output branches."""
