"""Acting with π0.5: the agent (encode once → selection → denoise → edit), the frozen-actor cache computed
from the acting side and handed to replay, where actors come from, the flow-loss trainer of the action
expert and the success buffer it learns from."""
