// Back from Stripe: move on to the plan page. This navigation starts here, on the portal,
// so the browser sends the SameSite=Strict session cookie it withheld from Stripe's redirect.
"use strict";
window.location.replace("/portal/#plan");
