"""Multi-turn episodes: the lecture's MDP with dynamics, sampled token-in, token-out.

A single-turn completion is an MDP whose dynamics are trivial (the next state is the previous one
with the action appended). In an episode the world answers: after each turn of the policy the
environment writes an observation (a tool's result, a game's feedback, a simulated user's reply),
and the policy's next turn conditions on it. With s_0 the prompt, the trajectory is

    tau = (s_0, a_1 ... a_k, o_1 ... o_m, a_{k+1} ...),
    p_theta(tau) = prod_{action tokens t} pi_theta(a_t | s_t) * prod_{environment tokens} P(o | s),

so

    grad log p_theta(tau) = sum over the policy's own tokens only of grad log pi_theta(a_t | s_t):

the environment's tokens are dynamics, independent of theta, and carry no log-prob term; they are
part of the state every later action conditions on (they stay in the forward pass, out of the
loss). `TrajectoryBatch.action_mask` says which tokens are actions; it has holes where the
environment wrote. Putting the environment's tokens in the loss adds E[grad log pi_theta(o|s) A],
which is not zero because o is drawn from P, not from pi_theta: a bias no batch size removes
(0.62 of |grad J| in tests/test_episodes_enumeration.py).

Rewards may arrive after any turn. Each sits on the last token of its turn, and reward-to-go
credits a token with the rewards of its own turn and the later ones, discounted per turn:

    ret_t = sum_{k >= turn(t)} gamma^(k - turn(t)) R_k          (`lmpg.advantages`, turn_ids)

(the whole return R = sum_k gamma^k R_k without reward-to-go). The G episodes of a group start from
the same initial state (same prompt, same environment seed), so the group baselines compare
episodes of one initial state, as in the single-turn case.

Token-in, token-out. The policy's sampled tokens are kept exactly as sampled; the environment's
text is tokenized on its own and appended, wrapped in the chat template's bridge tokens (derived
once by rendering, `ChatBridge`), so the history is never re-tokenised: decode-then-encode is not
the identity for BPE tokenizers, and a re-tokenised history would train on tokens the policy never
sampled (tests/test_episodes.py shows the log-probs move).
"""
