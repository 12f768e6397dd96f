// Building DOM nodes without HTML strings: text goes in as text nodes, so nothing from the model or
// from a file name is ever parsed as markup. The one exception, server-sanitised HTML, is set in
// pageview.js and nowhere else.

/**
 * h("button", {className: "x", type: "button", onclick: fn, dataset: {block: 1}}, "text", node...)
 * Properties starting with "on" become listeners; `attrs` are set with setAttribute; strings and
 * numbers among the children become text nodes; null, undefined and false children are skipped.
 */
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value == null) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "attrs") for (const [attr, v] of Object.entries(value)) node.setAttribute(attr, v);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node[name] = value;
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace every child of `node` with `children`. */
export function fill(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}
