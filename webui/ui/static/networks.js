// Network cards (Networks tab, txt2img panel): one delegated listener on the component root,
// which survives re-renders. A chip adds its word; the "i" button only selects; the strength
// box only edits; anywhere else on a card toggles its tag, at the card's strength if it has one.
const strengthOf = (card) => {
  const box = card && card.querySelector('input[data-strength]');
  return box ? box.value : null;
};
element.addEventListener('click', (event) => {
  if (event.target.closest('.lw-strength')) {
    event.stopPropagation();
    return;
  }
  const embedding = event.target.closest('[data-embedding]');
  if (embedding) {
    trigger('click', { kind: 'embedding', name: embedding.dataset.embedding });
    return;
  }
  const chip = event.target.closest('[data-word]');
  const holder = event.target.closest('[data-lora]');
  const name = holder ? holder.dataset.lora : '';
  if (chip) {
    event.stopPropagation();
    trigger('click', { kind: 'word', word: chip.dataset.word, name: name });
    return;
  }
  if (event.target.closest('[data-info]')) {
    event.stopPropagation();
    trigger('click', { kind: 'info', name: name });
    return;
  }
  if (holder && holder.classList.contains('lw-card')) {
    trigger('click', { kind: 'card', name: name, weight: strengthOf(holder) });
  }
});
element.addEventListener('keydown', (event) => {
  const card = event.target.closest('.lw-card');
  const inBox = event.target.closest('.lw-strength');
  if (card && (event.key === 'Enter' || (event.key === ' ' && !inBox))) {
    event.preventDefault();
    if (card.dataset.embedding) {
      trigger('click', { kind: 'embedding', name: card.dataset.embedding });
      return;
    }
    trigger('click', { kind: 'card', name: card.dataset.lora, weight: strengthOf(card) });
  }
});
