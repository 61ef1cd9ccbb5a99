() => {
  // Ctrl+Enter generates, Esc interrupts, Ctrl+Up/Down changes a weight by 0.1 in a prompt box.
  if (window.lwKeyboard) return;
  window.lwKeyboard = true;
  const STEP = 0.1;
  const round = (w) => Math.round(w * 100) / 100;
  const num = (w) => String(round(w));

  // The first strength of a <lora:...> tag spanning [start, end): "<lora:x:0.8>" -> 0.9.
  function loraEdit(text, start, end, delta) {
    const tag = /<(?:lora|lyco):[^<>]*>/g;
    let m;
    while ((m = tag.exec(text))) {
      const a = m.index, b = a + m[0].length;
      if (start > b || end < a) continue;
      const parts = m[0].slice(1, -1).split(':');
      const at = parts.findIndex((p, i) => i >= 2 && /^-?\d*\.?\d+$/.test(p.trim()));
      if (at < 0) parts.splice(2, 0, num(1 + delta));
      else parts[at] = num(parseFloat(parts[at]) + delta);
      const out = '<' + parts.join(':') + '>';
      return { text: text.slice(0, a) + out + text.slice(b), start: a, end: a + out.length };
    }
    return null;
  }

  // A1111's emphasis: "text" -> "(text:1.1)"; "(text:1.1)" -> "(text:1.2)"; back to 1 unwraps.
  function emphasisEdit(text, start, end, delta) {
    if (start === end) {  // no selection: the word under the cursor
      while (start > 0 && /[^\s,()<>]/.test(text[start - 1])) start--;
      while (end < text.length && /[^\s,()<>]/.test(text[end])) end++;
      if (start === end) return null;
    }
    const before = text.slice(0, start), after = text.slice(end);
    const open = before.endsWith('('), close = after.match(/^:(-?\d*\.?\d+)\)/);
    if (open && close) {
      const w = round(parseFloat(close[1]) + delta);
      const inner = text.slice(start, end);
      if (w === 1) {
        const t = before.slice(0, -1) + inner + after.slice(close[0].length);
        return { text: t, start: start - 1, end: end - 1 };
      }
      return { text: before + inner + ':' + num(w) + after.slice(close[0].length - 1), start, end };
    }
    const inner = text.slice(start, end);
    return {
      text: before + '(' + inner + ':' + num(1 + delta) + ')' + after, start: start + 1, end: end + 1,
    };
  }

  function editWeight(box, delta) {
    const { value, selectionStart: s, selectionEnd: e } = box;
    const edit = loraEdit(value, s, e, delta) || emphasisEdit(value, s, e, delta);
    if (!edit) return;
    box.value = edit.text;
    box.setSelectionRange(edit.start, edit.end);
    box.dispatchEvent(new Event('input', { bubbles: true }));  // Gradio reads the new value
  }

  const click = (id) => document.querySelector('#' + id)?.click();
  // capture: handled before Gradio's own listeners, which would also submit on Ctrl+Enter
  document.addEventListener('keydown', (event) => {
    const box = event.target.closest?.('#txt2img-prompt textarea, #txt2img-negative textarea');
    if (event.ctrlKey && event.key === 'Enter') {
      event.preventDefault();
      event.stopPropagation();
      click('txt2img-generate');
    } else if (event.key === 'Escape' && document.querySelector('#txt2img-generate')?.offsetParent) {
      click('txt2img-interrupt');
    } else if (box && event.ctrlKey && (event.key === 'ArrowUp' || event.key === 'ArrowDown')) {
      event.preventDefault();
      event.stopPropagation();
      editWeight(box, event.key === 'ArrowUp' ? STEP : -STEP);
    }
  }, true);
}
